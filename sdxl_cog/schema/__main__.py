"""`python -m sdxl_cog.schema`: write `.cog/openapi_schema.json` for predict.py (see openapi.py)."""

from sdxl_cog.schema.openapi import main

main()
