"""mlstore's benchmark harness: ``python benchmarks/run.py [--quick] [--only B1,B2]``.

Every scenario runs mlstore and the peers a user would pick instead (s3fs, fsspec's
``simplecache::`` and ``blockcache::``, boto3, obstore, raw local file reads) side by side
in one run, against a moto_server started in its own process (and, for the cloud
profile, a latency-adding proxy in front of it). See ``docs/benchmarks.md``.
"""
