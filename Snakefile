# lorapipe: LoRA fine-tuning of Stable Diffusion as a pipeline of cached stages.
# Everyday use: `snakemake --cores 4`. Only stale targets rerun. See README.md.
from snakemake.utils import min_version

min_version("9.0")

# The shipped demo (config/config.yaml) is read only when no config given on the command line
# names runs: `snakemake --configfile mine.yaml` plans your runs alone, not the demo's jobs too.
# Both: `--configfile config/config.yaml mine.yaml`. See README "Your own images".
if not config.get("runs"):

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/inputs.smk"
include: "rules/manifest.smk"
include: "rules/caption.smk"
include: "rules/shard.smk"
include: "rules/encode.smk"
include: "rules/train.smk"
include: "rules/sample.smk"
include: "rules/track.smk"
include: "rules/validation.smk"


# One warm process for the model stages' jobs while this invocation runs (lorapipe.warm, #17).
onstart:
    start_warm_worker()


# The run is over: its scheduler's wake-up timers would hold Snakemake's exit up to 1 s (#17).
onsuccess:
    cancel_scheduler_timers()


onerror:
    cancel_scheduler_timers()


rule all:
    default_target: True
    input:
        get_final_outputs(),
