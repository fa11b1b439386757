"""What the dashboard needs from the API itself: its static files at /ui (no key: the page holds no data), and
the jobs list's `status` filter. The dashboard in a browser: tests/e2e/test_dashboard.py."""

from __future__ import annotations

import re

from tests.api.helpers import KEY_A, KEY_B, assert_error, create_job_ok, upload_ok


def test_the_dashboard_is_served_at_ui_without_a_key(client):
    redirect = client.get("/ui", follow_redirects=False)
    assert redirect.status_code in (301, 307) and redirect.headers["location"].endswith("/ui/")
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Every file the page names is served (the vendored chart library included), so it works offline.
    for asset in re.findall(r'(?:src|href)="([^"#:]+)"', page.text):
        served = client.get(f"/ui/{asset}")
        assert served.status_code == 200 and served.content, asset
    assert "uPlot" in client.get("/ui/vendor/uplot-1.6.32/uPlot.iife.min.js").text
    assert "/ui" not in str(client.get("/openapi.json").json()["paths"])  # not part of the API's document
    assert client.get("/ui/nope.js").status_code == 404


def test_list_jobs_filtered_by_status(client):
    training_file = upload_ok(client)["id"]
    first, second, third = (create_job_ok(client, training_file)["id"] for _ in range(3))
    create_job_ok(client, upload_ok(client, headers=KEY_B)["id"], headers=KEY_B)  # another project's queued job
    for job_id in (first, third):
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=KEY_A).status_code == 200

    def listed(**params):
        return [j["id"] for j in client.get("/v1/fine_tuning/jobs", headers=KEY_A, params=params).json()["data"]]

    assert listed(status="cancelled") == [third, first]
    assert listed(status="queued") == [second]
    assert listed(status="succeeded") == []
    page = client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"status": "cancelled", "limit": 1}).json()
    assert [j["id"] for j in page["data"]] == [third] and page["has_more"] is True
    assert listed(status="cancelled", after=third) == [first]
    assert_error(client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"status": "done"}), 400, code="invalid_value", param="status")
