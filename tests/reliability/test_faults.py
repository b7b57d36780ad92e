import time, json
from conftest import api_keys, wait_for
from jobs_support import make_requests, submit, write_jsonl

def test_probe(own_redis, postgres_url, make_env, standin, tmp_path):
    env = make_env(postgres_url, api_keys(alpha=2, beta=1), RERANK_REDIS_URL=own_redis.url)
    c = own_redis.client()
    env.start_worker(concurrency=1, name="one")
    print("bindings", c.smembers("_kombu.binding.bulk"), c.smembers("_kombu.binding.interactive"))
    env.kill_worker(env.workers[0])
    job = submit(env, write_jsonl(tmp_path / "r.jsonl", make_requests(3)), )
    print("after submit", c.llen("bulk"), c.llen("interactive"))
    c.close()
