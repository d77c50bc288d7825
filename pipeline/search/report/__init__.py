"""The search's report: what the records say (`summary`), the evidence for the recommendation, the markdown, the plots."""
