"""Applications on top of the pipeline's data: the review page, reports, archive, offline verify, summary."""
