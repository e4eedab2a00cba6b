package org.mlexport.demo

import android.content.Context
import org.json.JSONObject
import java.io.File

/**
 * bundle.json, written by `mlexport bundle android`: which files make the model, their sizes and hashes, the
 * stop tokens, the context length and the chat prompt template. The app reads nothing else about the model.
 */
data class BundleContract(
    val modelFile: String,
    val dataFiles: List<String>,
    val tokenizerFile: String,
    val promptTemplate: String,
    val maxContext: Int,
    val runtimeVersion: String,
    val quant: String,
    val files: List<Pair<String, Long>>,
) {
    fun prompt(user: String): String = promptTemplate.replace("{prompt}", user).replace("{{", "{").replace("}}", "}")

    companion object {
        const val ASSET_DIR = "mlexport"
        const val SUPPORTED_CONTRACT = 1

        fun parse(json: String): BundleContract {
            val o = JSONObject(json)
            val version = o.getInt("contract_version")
            require(version == SUPPORTED_CONTRACT) { "bundle.json contract $version; this app reads $SUPPORTED_CONTRACT" }
            require(o.getString("target") == "executorch") { "bundle.json is for ${o.getString("target")}" }
            val data = o.getJSONArray("data_files")
            val files = o.getJSONArray("files")
            return BundleContract(
                modelFile = o.getString("model_file"),
                dataFiles = List(data.length()) { data.getString(it) },
                tokenizerFile = o.getString("tokenizer_file"),
                promptTemplate = o.getString("prompt_template"),
                maxContext = o.getInt("max_context"),
                runtimeVersion = o.getJSONObject("runtime").optString("version", "?"),
                quant = o.optString("quant", "?"),
                files = List(files.length()) { files.getJSONObject(it).let { f -> f.getString("path") to f.getLong("bytes") } },
            )
        }

        /**
         * LlmModule needs file paths, so the bundled assets are copied to app storage once (and again when a
         * new bundle changes a file's size); returns the contract and the directory holding the files.
         */
        fun install(context: Context): Pair<BundleContract, File> {
            val json = context.assets.open("$ASSET_DIR/bundle.json").bufferedReader().use { it.readText() }
            val contract = parse(json)
            val dir = File(context.filesDir, ASSET_DIR).apply { mkdirs() }
            for ((path, bytes) in contract.files) {
                val target = File(dir, path)
                if (target.isFile && target.length() == bytes) continue
                target.parentFile?.mkdirs()
                val partial = File(target.path + ".partial")
                context.assets.open("$ASSET_DIR/$path").use { input -> partial.outputStream().use { input.copyTo(it, 1 shl 20) } }
                check(partial.length() == bytes) { "$path: copied ${partial.length()} bytes, bundle.json says $bytes" }
                check(partial.renameTo(target)) { "cannot move $path into place" }
            }
            return contract to dir
        }
    }
}
