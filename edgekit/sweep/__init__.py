"""Skip × weight-format grids: run the exports and measurements (`runner`) and write the report
and Pareto plot (`report`).

May import: everything below it (targets, export, quality, skip, runtime, bundle, checkpoint, errors).
"""
