"""Entry script of rule place_gan_weights: a published generator checkpoint from a URL or a local copy, sha256-checked."""

from cfaudit.config import run_settings
from cfaudit.gan.checkpoint import load_generator, place_weights
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    p = run_settings(smk.params.pretrained, smk.config, "gan.pretrained")
    place_weights(smk.output.weights, p["sha256"], url=p["url"], local_path=p["local_path"], retries=p["retries"],
                  timeout_s=p["timeout_s"])
    # fail here, not in every shard job, if the file is not a generator checkpoint of the published layout
    _, info = load_generator(smk.output.weights, trust_pickle=smk.config["gan"]["pretrained"]["trust_pickle"])
    log.info("checkpoint holds a %s generator (epoch %s)", info["arch"], info["epoch"])
    write_job_provenance(smk, [smk.output.weights], started, extra={"checkpoint": info})
