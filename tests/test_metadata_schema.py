import json

import jsonschema
import pytest
from bundle_utils import SCHEMA, configs


@pytest.mark.parametrize("bundle", ["segreg_acdc", "segreg_abdomen", "segreg_thorax"])
def test_metadata_validates_against_the_model_zoo_schema(bundle):
    if not SCHEMA.is_file():
        pytest.skip(f"cannot validate {bundle}/configs/metadata.json: the Model Zoo schema is not at {SCHEMA}")
    meta = json.loads((configs(bundle) / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    assert meta["schema"].endswith("meta_schema_20240725.json")
