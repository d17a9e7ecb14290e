"""Entry script of rule isic_download: ISIC Archive images + metadata (isic-cli, or a committed id list)."""

from cfaudit.config import run_settings
from cfaudit.data.isic import download_isic
from cfaudit.provenance import now, write_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started, params = now(), run_settings(smk.params.isic, smk.config, "dataset.isic")
    result = download_isic(params, smk.output.download, smk.output.manifest)
    inputs = [params["id_list"]] if params.get("id_list") else []
    write_provenance(smk.output.manifest, inputs, {"dataset.isic": params}, "isic_download", started,
                     extra={"download": result.as_dict()})
    log.info("isic_download: %s", result.as_dict())
