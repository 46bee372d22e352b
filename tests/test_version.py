"""One version: backend_mgmt.__version__. The package metadata is built from it, and the
Debian changelog (whose format the packaging needs) must name the same upstream version."""

import importlib.metadata
import os
import re

import backend_mgmt

CHANGELOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "debian", "changelog")


def changelog_upstream_version(path=CHANGELOG):
    """"0.1.0" from the first entry "backend-mgmt (0.1.0-1) ...": no epoch, no revision."""
    with open(path, encoding="utf-8") as stream:
        first = stream.readline()
    version = re.match(r"\S+ \((?:\d+:)?([^)]+?)(?:-[^-)]*)?\)", first).group(1)
    return version


def test_debian_changelog_names_the_package_version():
    assert changelog_upstream_version() == backend_mgmt.__version__


def test_installed_metadata_is_the_package_version():
    assert importlib.metadata.version("backend-mgmt") == backend_mgmt.__version__


def test_the_changelog_reader_drops_epoch_and_revision(tmp_path):
    path = tmp_path / "changelog"
    path.write_text("backend-mgmt (2:1.2.3-4) unstable; urgency=medium\n")
    assert changelog_upstream_version(str(path)) == "1.2.3"
    path.write_text("backend-mgmt (1.2.3) unstable; urgency=medium\n")
    assert changelog_upstream_version(str(path)) == "1.2.3"
