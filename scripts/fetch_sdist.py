"""Downloads one sdist from a PEP 503 "simple" package index and checks its sha256.

Used by install_env.sh for detectron2: pip itself cannot download the pb1-detectron2 sdist because
its metadata declares a direct-URL extra that pip refuses.

Usage: python fetch_sdist.py PROJECT FILENAME DEST_DIR
"""

import hashlib
import os
import re
import sys
import urllib.parse
import urllib.request


def main():
    project, filename, dest = sys.argv[1:4]
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page_url = f"{index}/{project}/"
    html = urllib.request.urlopen(page_url, timeout=120).read().decode()
    links = [h for h in re.findall(r'href="([^"]+)"', html) if h.split("#")[0].endswith(filename)]
    if not links:
        sys.exit(f"fetch_sdist: {filename} is not listed on {page_url}")
    url, _, fragment = links[0].partition("#")
    url = urllib.parse.urljoin(page_url, url)
    target = os.path.join(dest, filename)
    print(f"fetch_sdist: downloading {url}", flush=True)
    data = urllib.request.urlopen(url, timeout=300).read()
    if fragment.startswith("sha256="):
        digest = hashlib.sha256(data).hexdigest()
        if digest != fragment[len("sha256=") :]:
            sys.exit(
                f"fetch_sdist: sha256 mismatch for {filename}: got {digest}, index says {fragment}"
            )
    with open(target, "wb") as f:
        f.write(data)
    print(f"fetch_sdist: saved {target} ({len(data)} bytes)", flush=True)


if __name__ == "__main__":
    main()
