"""cfaudit: audit melanoma classifiers with counterfactual images.

The Snakemake rules call thin entry scripts in ``workflow_scripts/``; the logic lives in this package as
pure functions and small classes, one module per concern, so that tests call them directly.
"""

__version__ = "0.1.0"
