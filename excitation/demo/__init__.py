"""The offline demo: two small ReLU CNNs trained in-repo on scikit-learn's bundled digits."""
