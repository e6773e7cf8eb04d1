"""The Hugging Face hub, asked once and briefly before anything waits on it.

huggingface_hub retries a request that gets no answer for about 25 s before it gives up, so a
machine without a network used to wait that long before hearing it. Before a hub model is
fetched, it is looked up in the local cache (no network); when it is not there, one request with
a short timeout and no retries asks whether the hub answers, and if not, a `UserError` says what
to do at once.
"""

from __future__ import annotations

from grpo_cli.errors import UserError

PROBE_TIMEOUT_S = 5.0  # for the one request that asks whether the hub answers


def unreachable() -> str | None:
    """Why the hub cannot be asked for files now, or None when it answers."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # no name resolution, refused, timed out, a proxy's error...
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
    return None


def in_cache(repo_id: str, filename: str = "config.json") -> bool:
    """Whether `filename` of hub repository `repo_id` is in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # not a valid repository id: loading it will say so
        return False


def not_available(name: str, why: str) -> UserError:
    """The error for hub model `name`, not in the cache while the hub cannot be asked (`why`)."""
    from huggingface_hub import constants

    offline = why.startswith("HF_HUB_OFFLINE")
    return UserError(
        f"{name} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        + ("HF_HUB_OFFLINE is set, so the hub is not asked. " if offline else
           f"the hub ({constants.ENDPOINT}) does not answer ({why}). ")
        + ("Unset HF_HUB_OFFLINE to download it, " if offline else
           "Connect to the network (for a gated or private model, log in first: hf auth login), ")
        + f"or download it where there is a network (hf download {name}), copy the cache here, and set "
        "HF_HUB_OFFLINE=1 so that nothing waits for the network."
    )


def require(name: str) -> None:
    """Refuse at once a hub model that is neither in the local cache nor reachable."""
    if in_cache(name):
        return
    why = unreachable()
    if why is not None:
        raise not_available(name, why)
