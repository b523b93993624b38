"""python -m ganops: what this installation was built with and what can run here."""

import json

import ganops

print(json.dumps(ganops.build_info(), indent=2))
