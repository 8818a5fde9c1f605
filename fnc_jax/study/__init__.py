"""The small-scale study (issue 14): named grids of quickstart runs (`grids`)."""
