"""Tests of what the Comfy Registry gets: the metadata comfy-cli reads from pyproject.toml, and the archive
``comfy node pack`` builds (the files every user downloads). The archive tests skip unless OVIS_U1_REGISTRY_ARCHIVE
names that archive; .ci/registry.sh installs comfy-cli, validates, packs and runs them:

    bash .ci/registry.sh
"""
