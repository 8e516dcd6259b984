"""The pyarrow filesystem Ray Train gets for S3 storage keeps its retries where Ray ships it."""

import pickle

from dreambooth_ray.settings import S3Settings
from dreambooth_ray.storage import Storage

from s3proxy import FaultyS3Proxy


def test_the_run_filesystem_retries_a_throttled_store_after_ray_pickles_it(s3_endpoint, bucket):
    proxy = FaultyS3Proxy(s3_endpoint)
    try:
        _, fs = Storage(f"s3://{bucket}/root", S3Settings(endpoint_url=proxy.url)).ray_storage()
        fs = pickle.loads(pickle.dumps(fs))  # as Ray sends the RunConfig's filesystem to its controller
        # Five throttled answers in a row for this file: more than pyarrow's default 3 attempts allow.
        proxy.fail_matching = ("/root/snapshot.json", 5)
        with fs.open_output_stream(f"{bucket}/root/snapshot.json") as out:
            out.write(b"{}")
        assert proxy.injected == 5
        assert fs.open_input_stream(f"{bucket}/root/snapshot.json").read() == b"{}"
    finally:
        proxy.close()
