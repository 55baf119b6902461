from lorapipe.jobtime import start

start(snakemake.log[0])  # phases to <log>.times.json (#17)
from lorapipe.warm import delegate

delegate(wait=True)  # in the workflow's warm worker when it serves this job (#17)
from lorapipe.captions import VariantSettings
from lorapipe.io import localized
from lorapipe.latent_folder import encode_folder
from lorapipe.logs import setup

log = setup(snakemake.log[0])
p, i, o = snakemake.params, snakemake.input, snakemake.output
encode_folder(
    list(i.tars),
    list(o.tars),
    localized(p.model_path, i),
    list(i.model),
    p.cache,
    batch_size=p.batch_size,
    dtype=p.dtype,
    original_config=localized(p.original_config, i),
    vae=localized(p.vae, i),
    vae_files=list(i.vae),
    variants=VariantSettings(**p.variants),
    identity={"code": p.code, "libs": p.libs},
    threads=snakemake.threads,
)
