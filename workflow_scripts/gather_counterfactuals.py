"""Entry script of every generator's gather rule: concatenate the shard indexes into one, checked complete."""

import pandas as pd

from cfaudit.counterfactuals import gather
from cfaudit.provenance import now, write_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    shards = list(smk.input.shards)
    anchors = pd.read_csv(smk.input.anchors)
    df = gather(shards, smk.output.index, anchors=anchors)
    generator = smk.wildcards.generator
    if set(df["generator"]) - {generator}:
        raise ValueError(f"shard indexes {shards} contain rows of generators {sorted(set(df['generator']))}, "
                         f"expected only {generator!r}")
    write_provenance(smk.output.index, [*shards, smk.input.anchors], {"generator": generator, "shards": len(shards)},
                     rule=smk.rule, started=started)
    log.info("%s: %d counterfactuals of %d anchors from %d shards", generator, len(df), df["anchor_id"].nunique(), len(shards))
