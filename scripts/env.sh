# Sourced by the other scripts: picks the Python environment pixart-tune lives in.
#
# An environment the user has activated (a venv, or a conda env other than base) is
# used as it is. Otherwise the checkout's own .venv is used, created on first need,
# so that nothing is installed into the system's Python. Afterwards $PY is that
# environment's python and its bin/ leads PATH (so `pixart-tune` is the one installed).
# PYTHON chooses the interpreter that creates .venv (default: python3).

if [ -n "${VIRTUAL_ENV:-}" ]; then
  env_dir=$VIRTUAL_ENV
elif [ -n "${CONDA_PREFIX:-}" ] && [ "${CONDA_DEFAULT_ENV:-base}" != base ]; then
  env_dir=$CONDA_PREFIX
else
  env_dir=$PWD/.venv
  if [ ! -x "$env_dir/bin/python" ]; then
    echo "creating the project's virtual environment in .venv (activate it later with: . .venv/bin/activate)"
    "${PYTHON:-python3}" -m venv "$env_dir"
  fi
fi
PY=$env_dir/bin/python
export PATH="$env_dir/bin:$PATH"
