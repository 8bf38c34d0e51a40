"""tokenledger's Alembic migrations, shipped in the wheel as ``tokenledger.migrations``.

Run them with ``tokenledger db upgrade`` or `tokenledger._schema.upgrade`; there is no
``alembic.ini``: the configuration is built in code.
"""
