"""SQL persistence: the record of jobs, requests, results, upstream calls and usage."""
