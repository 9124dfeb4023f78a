"""Reusable property checks for SAE implementations (sae-ref's own and other people's).

:mod:`sae_ref.validation.strategies` holds the hypothesis strategies the test suite uses to
generate SAE-shaped inputs; the checks that take a user's callable build on them.
"""
