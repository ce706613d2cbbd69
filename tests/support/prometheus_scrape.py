"""Read a portal's /metrics (or an engine's) with the Prometheus parser, for tests that count exactly.

    before = scrape(portal)
    ... traffic ...
    after = scrape(portal)
    assert after.value("pilotfish_requests_total", route="gateway", status="200") - \\
        before.value("pilotfish_requests_total", route="gateway", status="200") == 7
"""
from __future__ import annotations

from typing import Dict, List

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """Parsed samples; `value` adds up every sample of a name whose labels include the given ones."""

    def __init__(self, text: str):
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = [sample for family in self.families.values() for sample in family.samples]

    def matching(self, name: str, **labels) -> List:
        return [sample for sample in self.samples
                if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())]

    def value(self, name: str, **labels) -> float:
        return sum(sample.value for sample in self.matching(name, **labels))

    def label_values(self, name: str, label: str) -> Dict[str, float]:
        found: Dict[str, float] = {}
        for sample in self.matching(name):
            key = sample.labels.get(label)
            found[key] = found.get(key, 0.0) + sample.value
        return found


def scrape(portal, path: str = "/metrics") -> Scrape:
    """GET `path` from a tests.support.portal_process.PortalProcess with its token and parse it."""
    response = portal.request("GET", path)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["Content-Type"].startswith("text/plain"), response.headers["Content-Type"]
    return Scrape(response.text)


def delta(before: Scrape, after: Scrape, name: str, **labels) -> float:
    return after.value(name, **labels) - before.value(name, **labels)
