#!/usr/bin/env bash
# Wheels a GPU machine without internet needs to run chronomerge's benchmarks (bench/gpu_bench.py),
# for its Python 3.12 on x86_64, into .whl/ (ignored by git): open_clip and its two small
# dependencies, and the pipeline's packages (Prefect, MLflow, pydantic, ...) that an image holding
# torch, numpy, pandas and the scientific stack lacks. Carry .whl/ and install there with
#   python3 -m pip install --no-deps --no-index .whl/*.whl && python3 -m pip install --no-deps --no-build-isolation -e .
# (skip the pipeline's packages and run gpu_bench.py --skip stream where the carry limit is tight).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
plat=(--python-version "${PYVER:-3.12}" --only-binary=:all: --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any)
rm -rf .whl && mkdir -p .whl/closure
"$PIP" download -q --no-deps -d .whl "${plat[@]}" "open_clip_torch>=2.24,<4" ftfy wcwidth
"$PIP" download -q -d .whl/closure "${plat[@]}" "prefect>=3.4,<3.9" "mlflow>=2.14,<4" "fastapi<0.140" \
  "sqlalchemy>=2.0,<2.1" "pydantic>=2.5,<3"
# What such an image already holds (the scientific stack and its common dependencies) stays behind.
present='^(numpy|pandas|scipy|scikit_learn|matplotlib|pillow|pyarrow|contourpy|fonttools|kiwisolver|cycler|pyparsing|python_dateutil|six|packaging|pyyaml|jinja2|markupsafe|click|requests|urllib3|idna|certifi|charset_normalizer|protobuf|fsspec|anyio|httpx|httpcore|h11|attrs|rich|pygments|markdown|markdown_it_py|mdurl|typing_extensions|tqdm|joblib|threadpoolctl|psutil|filelock|werkzeug|aiohttp|aiosignal|aiohappyeyeballs|frozenlist|multidict|yarl|propcache|narwhals|prometheus_client|cloudpickle|typer|shellingham|colorama|pathspec|pluggy|zipp|humanize|uvloop|regex|grpcio|wrapt|xxhash|msgpack|tzdata|pytz)-'
for w in .whl/closure/*.whl; do
  name=$(basename "$w")
  if ! [[ ${name,,} =~ $present ]]; then mv "$w" .whl/; fi
done
rm -rf .whl/closure
du -sh .whl
