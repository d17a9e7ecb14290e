"""Names shared by the package and the Snakemake rules, in a module that imports nothing (rules/common.smk reads it
at parse time)."""

ORIGINAL = "original"  # the generator name of the unmodified images in score tables, metrics and trait tables
