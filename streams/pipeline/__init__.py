"""The running pipeline: the Faust app and its agents, their per-key state, and the ClickHouse sink process."""
