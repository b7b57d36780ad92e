"""The use cases, one module each; the CLI and the HTTP API are two thin doors onto them.

- `submit`   validate and store a job, publish its requests
- `run`      a worker claims requests in SQL and hands them to its pipeline
- `read`     job status, lists and result lines
- `usage`    tokens, calls and cost (live calls plus the rollup of pruned jobs), cache savings
- `control`  cancel a job, or retry its failed requests
- `estimate` what a file would cost and take, storing nothing
- `prune`    retention of finished jobs (rolled up into daily usage) and of the score cache
- `prices`   the price table
- `scope`    whose jobs a caller may see, and the sessions every use case opens
"""
