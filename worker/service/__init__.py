"""The use cases, one module each; the CLI and the HTTP API are two thin doors onto them.

- `submit`   validate and store a job, publish its requests
- `run`      a worker claims requests in SQL and hands them to its pipeline
- `read`     job status, lists and result lines
- `usage`    tokens, calls and cost, and score-cache savings
- `control`  cancel a job
- `scope`    whose jobs a caller may see, and the sessions every use case opens
"""
