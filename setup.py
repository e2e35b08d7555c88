"""The one build step pyproject.toml cannot declare: the ``.pth`` file that loads ``duallora_autoload`` at start-up.

Everything else about the package is in pyproject.toml. Why the file exists: src/duallora_autoload.py.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "duallora-autoload.pth"
PTH_LINE = "import duallora_autoload\n"  # site runs .pth lines that start with "import"


class BuildPyWithAutoloadPth(build_py):
    """build_py, and the ``.pth`` at the wheel's root (site-packages itself once installed).

    A wheel is made of ``build_lib``. An editable wheel is not (its modules stay in src/): setuptools writes the files
    it installs as they are into the unpacked wheel, ``install_lib``, so the ``.pth`` goes there.
    """

    def run(self):
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(root).mkdir(parents=True, exist_ok=True)
        Path(root, PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH_NAME))]


setup(cmdclass={"build_py": BuildPyWithAutoloadPth})
