# One gather rule for every sharded generator (gan, diffusion, guided, guided_noclf): the shard jobs of
# rules/{gan,diffusion,guided}.smk each write results/counterfactuals/{generator}/shard_{n}/index.csv and their
# PNGs in the declared folder shard_{n}/images; gather_counterfactuals joins the shard indexes into
# results/counterfactuals/{generator}/index.csv, checked complete against the anchors.


localrules:
    gather_counterfactuals,


rule gather_counterfactuals:
    """One index of every counterfactual of a generator; fails if any (anchor, target) pair is missing."""
    input:
        shards=expand(f"{CF_DIR}/{{generator}}/shard_{{shard}}/index.csv", shard=SHARDS, allow_missing=True),
        anchors=rules.anchors.output.anchors,
    output:
        index=f"{CF_DIR}/{{generator}}/index.csv",
        prov=prov(f"{CF_DIR}/{{generator}}/index.csv"),
    wildcard_constraints:
        generator="|".join(SHARDED_GENERATORS) or "NO_GENERATOR",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/counterfactuals/gather_{{generator}}.log",
    script:
        entry_script("gather_counterfactuals.py")


ALL_TARGETS.extend(cf_index(g) for g in GENERATORS)
