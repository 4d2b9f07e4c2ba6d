"""Trust: cosign-compatible signatures and containers-policy.json (docs/spec/trust.md).

``keys`` (cosign key files), ``cosign`` (payload, signature, attachment manifest), ``gpg`` (GPG simple
signing through the gpg binary), ``lookaside`` (registries.d and the signature-N files), ``policy`` (parse
and evaluate policy.json), ``image`` (signatures in registries; the policy check at pull, mount and run).
Modules are imported by name (``shoal.trust.image``) so that a command that never signs loads no crypto.
"""
