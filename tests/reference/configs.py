"""config.json variations for the bridge's tests."""

import copy

DROP = object()  # as a value in `changed`: leave the key out


def changed(config: dict, **changes) -> dict:
    """A deep copy of `config` with keys set, or left out where the value is DROP."""
    out = copy.deepcopy(config)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key)
        else:
            out[key] = value
    return out
