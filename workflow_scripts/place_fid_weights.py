"""Entry script of rule place_fid_weights: pytorch-fid's Inception weights into TORCH_HOME, or the reason why not."""

from pathlib import Path

from cfaudit.config import run_settings
from cfaudit.fid import place_weights, write_status
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    p = run_settings(smk.params.fid, smk.config, "metrics.fid")
    torch_home = Path(smk.output.status).parent  # resources/torch_home: TORCH_HOME of the realism rule
    status = place_weights(torch_home, p["weights_path"], p["weights_url"], p["check_hash"],
                           p["download_timeout_s"])
    if status["available"]:
        log.info("FID-Inception weights at %s (%s, sha256 %s)", status["path"], status["source"], status["sha256"])
    else:
        log.warning("%s; the realism rule will report an oracle-feature FD instead of FID", status["reason"])
    write_status(status, smk.output.status)
