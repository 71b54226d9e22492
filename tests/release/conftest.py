from tests.train.conftest import botchan_shards  # noqa: F401 (the tiny Botchan shards fixture)
