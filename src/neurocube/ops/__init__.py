"""Lazy operations on Datasets: masks, ROI grammar, trial filters, merges, aggregation."""
