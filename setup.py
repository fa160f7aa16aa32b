from setuptools import find_packages, setup


def read_readme():
    try:
        with open('README.md', encoding='utf-8') as f:
            return f.read()
    except OSError:
        return ''


def read_version():
    scope = {}
    with open('restv2_mm/version.py') as f:
        exec(f.read(), scope)
    return scope['__version__']


setup(
    name='restv2_mm',
    version=read_version(),
    description='ResTv2 backbone for OpenMMLab detection (mmdet 3.x) and segmentation '
    '(mmseg 1.x)',
    long_description=read_readme(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.8',
    packages=find_packages(include=['restv2_mm', 'restv2_mm.*']),
    # torch and mmcv (compiled against that torch) are installed by tools/setup_env.sh.
    install_requires=[
        'mmengine>=0.10.5,<0.11',
        'mmdet==3.3.0',
        'mmsegmentation==1.2.2',
        'pycocotools',
        'ftfy',
        'regex',
        'matplotlib',
    ],
    extras_require={
        # onnx export (tools/deploy/export_onnx.py) and its tests
        'tests': ['pytest>=7', 'onnx>=1.16', 'onnxruntime>=1.18', 'onnxscript>=0.3'],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
