# The HTML report's landing page: rule run_identity records the run's identity (git commit, dirty flag, config
# sha256, package versions, device) at run time into results/run_identity.json and writes the landing page
# (rules/report/workflow.rst + that identity as text) to results/report_front_page.rst. It takes every other
# deliverable as input, so it runs last whenever any stage ran: the identity is that of the run that last
# touched the results. A setting that changes no result (compute.device, log_every, ...) reruns nothing, not
# even this rule.   snakemake --report results/report.html
# Nothing here runs while the Snakefile is parsed: no git, no environment variables (cluster jobs re-parse it).

RUN_IDENTITY = f"{RESULTS}/run_identity.json"
REPORT_FRONT_PAGE = f"{RESULTS}/report_front_page.rst"


report: os.path.abspath(REPORT_FRONT_PAGE)  # written by run_identity; read only by `snakemake --report`


localrules:
    run_identity,


rule run_identity:
    """The run's identity for the report's landing page, recorded after every other deliverable."""
    input:
        template=workflow.source_path("report/workflow.rst"),
        deliverables=list(ALL_TARGETS),
    output:
        identity=RUN_IDENTITY,
        front_page=REPORT_FRONT_PAGE,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/report/run_identity.log",
    script:
        entry_script("run_identity.py")


ALL_TARGETS.extend([RUN_IDENTITY, REPORT_FRONT_PAGE])
