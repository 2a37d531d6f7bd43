"""The segflow DAG (@dsl.pipeline), its local runner and example configs."""
