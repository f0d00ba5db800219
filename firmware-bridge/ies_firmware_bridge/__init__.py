"""The firmware and file bridge of the IES edge agent (DESIGN section 8).

A separate service that moves signed firmware and diagnostics files between the
upstream and field devices that cannot reach the internet. Not built yet: see the
project's open issue for the firmware bridge. This package exists so the layout of the
distribution is the one the design card fixes.
"""
