# lorapipe: LoRA fine-tuning of Stable Diffusion as a pipeline of cached stages.
# Everyday use: `snakemake --cores 4`. Only stale targets rerun. See README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/inputs.smk"
include: "rules/manifest.smk"
include: "rules/caption.smk"
include: "rules/shard.smk"
include: "rules/encode.smk"
include: "rules/train.smk"
include: "rules/sample_steps.smk"
include: "rules/track.smk"
include: "rules/validation.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
