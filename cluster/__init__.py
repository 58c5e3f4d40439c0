"""Cluster manifests (KubeRay, the Ray cluster launcher, the image) and the generator that keeps
the RayService's ``serveConfigV2`` in step with ``deployments/serve.yaml`` (:mod:`cluster.render`)."""
