"""Who owns what: the ownership records of prompts and files (Redis), the per-user folder
namespaces, file references and attribution, and the per-socket event filter built on them.
Below the multi-instance layer (sticky routing, lost prompts and fan-in read them) and the
isolation guards (``proxy.isolation``) that decide with them."""
