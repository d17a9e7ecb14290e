"""Entry script of rule traits: paired statistics, ranked table and figures of the trait analysis."""

from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging
from cfaudit.traits.stage import statistics_step

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    p = smk.params
    outputs = {k: smk.output[k] for k in ("paired", "labels", "artefacts", "ranked", "html", "differences", "originals",
                                          "segmentation")}
    outputs["examples"] = list(smk.output.examples)
    res = statistics_step(smk.input.features, outputs, seed=p.seed, generators=list(p.generators),
                          statistics=p.statistics, figures=p.figures, segmentation=p.segmentation, cue=p.cue,
                          cue_effect_path=smk.input.cue_effect[0] if smk.input.cue_effect else None)
    files = [v for k, v in outputs.items() if k != "examples"] + outputs["examples"]
    write_job_provenance(smk, files, started, read=res["features"]["path"])
    log.info("wrote %d tables and figures", len(files))
