"""The DAG components; each has a KFP-free core and a thin KFP wrapper."""
