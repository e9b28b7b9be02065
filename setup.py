"""Packaging for vllm-transformers-backend.

Besides the two packages (``patches/`` is installed as ``vllm_transformers_backend.patches``), the
distribution installs ``vllm_transformers_backend.pth`` into site-packages. Python runs it at start-up;
it arms a post-import hook so that vLLM is patched the moment it is imported, before ``EngineArgs`` or
the CLI parser exist (vLLM's own plugin group loads too late for that). The hook imports neither torch
nor vLLM.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
PTH = HERE / "vllm_transformers_backend.pth"


class BuildPyWithPth(build_py):
    """Puts the start-up ``.pth`` at the root of the wheel (= site-packages)."""

    def run(self):
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name))


cmdclass = {"build_py": BuildPyWithPth}

try:
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        """Editable installs get the ``.pth`` too (``pip install -e .``)."""

        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            self.copy_file(str(PTH), str(Path(unpacked_wheel) / PTH.name))
            return result

    cmdclass["editable_wheel"] = EditableWheelWithPth
except ImportError:  # setuptools < 64 has no PEP 660 editable installs
    pass

setup(
    name="vllm-transformers-backend",
    version="0.1.0",
    description="The Transformers modeling backend for vLLM 0.6.2 and its forks",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["vllm_transformers_backend", "vllm_transformers_backend.patches"],
    package_dir={
        "vllm_transformers_backend": "vllm_transformers_backend",
        "vllm_transformers_backend.patches": "patches",
    },
    # vLLM and torch are the user's choice of build (CUDA wheel, CPU build, MLU fork): not required here.
    install_requires=["packaging"],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout",
            "gguf>=0.10",
            "accelerate",
            "sentencepiece",
            "protobuf",
            "openai>=1,<2",
            "sentence-transformers",
        ],
        "bench": ["matplotlib"],
    },
    entry_points={
        # vLLM 0.6.2 loads this group in the engine and in every worker process.
        "vllm.general_plugins": ["transformers_backend = vllm_transformers_backend.plugin:register"],
        "console_scripts": ["vllm-transformers-backend = vllm_transformers_backend.__main__:main"],
    },
    cmdclass=cmdclass,
    zip_safe=False,
)
