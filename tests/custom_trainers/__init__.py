"""Example custom trainers (``entrypoint: "tests.custom_trainers.toy:train"``)."""
