"""Evaluation on frozen features: weighted kNN (`knn`) and false-negative identification analysis
(`fn_analysis`). Submodules are imported explicitly, so importing this package stays cheap."""
