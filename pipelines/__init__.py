"""mscn.pipelines"""
