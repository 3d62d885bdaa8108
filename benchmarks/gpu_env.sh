# Source on the GPU machine (device tool): installs the carried wheels (.whl/) into /tmp/site
# and puts them and this checkout on PYTHONPATH. The image has torch; transformers 5.24,
# pluggy and bitsandbytes travel as wheels.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
# PYTHONPATH directories are not site directories: the .pth bootstrap (pipeline(..., fastpath=...),
# TRANSFORMERS_FASTPATH) works only from the interpreter's site-packages.
cp transformers_fastpath.pth "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/" \
  || echo "gpu_env: cannot install the .pth bootstrap; pipeline(..., fastpath=...) will be ignored" >&2
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -c "import torch, transformers, transformers_fastpath; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())"
